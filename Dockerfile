# One image for every service; the command picks the service (`huitou serve <name>`).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
RUN pip install --no-cache-dir .
USER nobody
EXPOSE 8000
ENV HUITOU_HOST=0.0.0.0 HUITOU_PORT=8000
CMD ["huitou", "serve", "ingest"]
