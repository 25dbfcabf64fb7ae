FROM scratch AS build
FROM scratch AS test
