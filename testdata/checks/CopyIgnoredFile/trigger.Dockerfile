FROM scratch
COPY notes.txt secret.key /app/
