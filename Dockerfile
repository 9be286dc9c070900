# syntax=docker/dockerfile:1
# ovms-mtls on top of the official OpenVINO Model Server image: a drop-in for
# the nginx-based mTLS example image. Same invocation as OVMS itself:
#   docker run -v $PWD/certs:/certs:ro -v $PWD/models:/models:ro -p 9000:9000 -p 8000:8000 \
#     IMAGE --model_name dummy --model_path /models/dummy --port 9000 --rest_port 8000
# The public ports speak mutual TLS; OVMS itself listens on loopback only.
ARG OVMS_TAG=2025.2
ARG NODE_VERSION=24

# ---- build stage: compiler, npm and sources stay here ----
FROM node:${NODE_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --ignore-scripts
COPY tsconfig.json ./
COPY bin ./bin
COPY proto ./proto
COPY scripts ./scripts
COPY src ./src
# One self-contained executable (Node single executable application): the
# final image needs neither node nor node_modules.
RUN npm run build:binary

# ---- final stage: the unmodified OVMS image plus tini, the executable and the env file ----
FROM openvino/model_server:${OVMS_TAG}
ARG OVMS_TAG
LABEL org.opencontainers.image.title="ovms-mtls" \
      org.opencontainers.image.description="OpenVINO Model Server behind mutual TLS (gRPC and REST)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/openvino/model_server:${OVMS_TAG}"
USER root
# tini as PID 1: forwards signals to ovms-mtls and reaps zombies.
COPY --from=build /usr/bin/tini-static /usr/bin/tini
COPY --from=build /src/dist/sea/ovms-mtls /usr/local/bin/ovms-mtls
COPY config/ovms-mtls.env /usr/share/ovms-mtls/ovms-mtls.env
# /certs exists and belongs to ovms so a named volume mounted there is writable
# by `ovms-mtls certs init` (docker compose's certs-init service).
RUN mkdir -p /certs && chown ovms /certs && chmod 0750 /certs
USER ovms
# Where the entrypoint looks for certificates unless --mtls_* options say otherwise.
VOLUME ["/certs"]
EXPOSE 9000 8000
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/ovms-mtls"]
