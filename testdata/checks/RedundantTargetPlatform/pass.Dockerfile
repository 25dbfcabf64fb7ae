FROM --platform=$BUILDPLATFORM scratch
