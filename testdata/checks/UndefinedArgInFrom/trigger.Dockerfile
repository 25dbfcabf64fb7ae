FROM busybox:${VARIANT}
