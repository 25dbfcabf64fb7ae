FROM scratch
ENTRYPOINT ["my-server", "--port", "80"]
FROM scratch
SHELL ["/bin/sh", "-c"]
CMD echo shell wanted
