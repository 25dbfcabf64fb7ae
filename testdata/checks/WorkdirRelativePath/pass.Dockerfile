FROM scratch
WORKDIR /app
WORKDIR src
