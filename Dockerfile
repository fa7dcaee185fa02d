# One image for the driver and the workers: `orchestrator ingest ...` or `orchestrator worker`.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY orchestrator ./orchestrator
COPY tasks ./tasks
COPY bench ./bench
COPY examples ./examples
RUN pip install --no-cache-dir .

# Workers and driver reach Redis through REDIS_URL (set by compose.yaml).
ENTRYPOINT ["orchestrator"]
CMD ["--help"]
