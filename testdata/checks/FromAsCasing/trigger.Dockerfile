FROM scratch as build
