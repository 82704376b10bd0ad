# workerhost itself as an image (used by compose.yaml). The workers it runs are
# separate images on the same engine, reached through /var/run/docker.sock.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY runner ./runner
RUN pip install --no-cache-dir .
COPY workerhost.toml ./
CMD ["workerhost", "serve"]
