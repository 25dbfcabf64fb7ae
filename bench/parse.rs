//! Parse throughput: generates a large realistic recipe and prints MB/s (std::time, no harness).

use std::hint::black_box;
use std::time::Instant;

/// One realistic block of instructions (stage, scripts, heredoc, metadata); repeated.
fn block(i: usize) -> String {
    format!(
        r#"# syntax-like comment for stage {i}
FROM --platform=$BUILDPLATFORM golang:1.22-alpine AS build{i}
ARG VERSION=1.{i}.0 TARGETOS TARGETARCH
ENV CGO_ENABLED=0 GOFLAGS="-trimpath -mod=readonly" PATH=/go/bin:$PATH
WORKDIR /src
COPY --link go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    go mod download && \
    apk add --no-cache git ca-certificates tzdata && \
    # keep the layer small
    rm -rf /var/cache/apk/*
COPY --from=build{i} --chown=app:app ["/src/bin", "/usr/local/bin/"]
RUN <<EOF
set -eu
echo "building {i}"
go build -ldflags "-X main.version=${{VERSION}}" -o /out/app ./cmd/app
EOF
LABEL org.opencontainers.image.title="app {i}" org.opencontainers.image.version=$VERSION
EXPOSE 8080/tcp 9090
HEALTHCHECK --interval=30s --timeout=3s --retries=3 CMD ["/usr/local/bin/app", "health"]
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/app"]
CMD ["serve", "--addr", ":8080"]

"#
    )
}

fn main() {
    let mut src = String::new();
    let mut i = 0;
    while src.len() < 8 << 20 {
        src.push_str(&block(i));
        i += 1;
    }
    let mb = src.len() as f64 / 1e6;
    // Warm up once, then take the best of a few runs.
    kiln::recipe::parse(src.as_bytes(), "Dockerfile").expect("benchmark recipe parses");
    for (name, typed) in [("parse_syntax", false), ("parse (typed)", true)] {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            if typed {
                black_box(kiln::recipe::parse(src.as_bytes(), "Dockerfile").expect("parses"));
            } else {
                black_box(
                    kiln::recipe::parse_syntax(src.as_bytes(), "Dockerfile").expect("parses"),
                );
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{name}: {mb:.1} MB, {i} stages, best of 3 {best:.3} s = {:.1} MB/s",
            mb / best
        );
    }
}
