FROM scratch AS context
