# One image for both compose services: the one-shot trainer/exporter and the inference service.
# CPU build (torch CPU wheel, fbgemm-gpu-cpu); scripts/install.sh does the same outside Docker.
FROM python:3.11-slim

# g++ and ninja: kernels/tt_native compiles its C++ TT kernels on first use (falls back to torch without them)
RUN apt-get update && apt-get install -y --no-install-recommends g++ ninja-build curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
ENV PYTHONUNBUFFERED=1 RECSYS_VENV=/opt/venv PATH=/opt/venv/bin:$PATH

COPY pyproject.toml README.md ./
COPY scripts ./scripts
COPY kernels ./kernels
COPY recsys ./recsys
COPY pipelines ./pipelines
COPY service ./service
COPY configs ./configs
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install --no-cache-dir fbgemm-gpu-cpu==1.8.0 \
    && pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps torchrec==1.8.0

EXPOSE 8000
# the service by default; docker-compose.yml runs the trainer with another command
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
