FROM scratch
ENV GREETING hello world
