FROM --platform=$TARGETPLATFORM scratch
