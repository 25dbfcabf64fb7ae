FROM scratch AS build
