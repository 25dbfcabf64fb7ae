FROM scratch
COPY a /a
env A=1
