# One image for all four services; the command picks the service.
# The worker needs the `worker` extra (torch); a torch-free image for the
# gateway, guard and auditor can be built with EXTRAS=gateway,guard,auditor.
FROM python:3.11-slim
ARG EXTRAS=gateway,guard,auditor,worker
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip install --no-cache-dir ".[${EXTRAS}]"
USER 10001
ENV BASTION_DATA_DIR=/var/lib/bastion HF_HUB_OFFLINE=1
