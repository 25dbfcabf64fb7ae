FROM --platform=$BUILDPLATFORM scratch AS build
FROM --platform=linux/amd64 scratch AS build_amd64
