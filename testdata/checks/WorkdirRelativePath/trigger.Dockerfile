FROM scratch
WORKDIR app/src
