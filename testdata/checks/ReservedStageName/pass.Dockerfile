FROM scratch AS ctx
