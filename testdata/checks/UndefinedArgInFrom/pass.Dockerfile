ARG VARIANT=latest
FROM busybox:${VARIANT}
