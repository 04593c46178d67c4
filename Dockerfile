# One image per service, holding only that service and the shared package:
#   docker build --build-arg SERVICE=gateway -t bastion-gateway .
# SERVICE=cli (the default) installs every service, for the all-in-one image
# that compose.yaml runs; the command picks the service.
FROM python:3.11-slim
ARG SERVICE=cli
WORKDIR /app
COPY services ./services
RUN if [ "$SERVICE" = cli ]; then set -- ./services/*/; \
    else set -- ./services/common "./services/$SERVICE"; fi; \
    pip install --no-cache-dir "$@"
USER 10001
ENV BASTION_DATA_DIR=/var/lib/bastion HF_HUB_OFFLINE=1
