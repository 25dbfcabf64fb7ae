FROM scratch
ENV PATH=$PAHT:/opt/bin
