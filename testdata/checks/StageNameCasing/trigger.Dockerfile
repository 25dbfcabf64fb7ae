FROM scratch AS Build
