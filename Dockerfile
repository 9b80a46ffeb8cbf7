# One image for every celery-sagas service (worker, beat, Flower, metrics exporter, migrate):
#   docker compose up          (see docker-compose.yml)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# The package, installed with the extras the deployment uses (the Redis broker, which
# needs kombu's redis extra; the PostgreSQL driver; Flower; the Prometheus exporter), and
# the example deployment (workers/), which is not part of the package: it is imported
# from /app through PYTHONPATH. README.md, LICENSE and CHANGELOG.md belong to the package.
COPY pyproject.toml MANIFEST.in README.md LICENSE CHANGELOG.md ./
COPY celery_sagas ./celery_sagas
COPY workers ./workers
ENV PYTHONPATH=/app
RUN pip install ".[redis,postgres,flower,prometheus]" \
    && useradd --create-home --uid 10001 sagas

# Celery refuses to run as root with pickle and warns otherwise: run as a plain user.
# Writable state (beat's schedule file) goes to /tmp.
USER sagas
WORKDIR /home/sagas

EXPOSE 5555 9808
CMD ["celery", "-A", "workers.app", "worker", "-l", "INFO", "-E"]
