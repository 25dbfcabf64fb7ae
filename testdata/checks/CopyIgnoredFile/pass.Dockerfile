FROM scratch
COPY notes.txt /app/
