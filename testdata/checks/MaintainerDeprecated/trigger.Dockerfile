FROM scratch
MAINTAINER Jane Doe <jane@example.com>
