# One image for both compose services: the one-shot trainer/exporter and the inference service.
# CPU build (torch CPU wheel, fbgemm-gpu-cpu), installed by scripts/install.sh as outside Docker.
#
# Two stages: `build` has the compiler and compiles the native TT kernels (setup.py, every x86-64
# level; the running CPU picks its own); `runtime` copies only the finished virtual environment, so
# it carries no compiler and compiles nothing when a container starts.

FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# a regular (not editable) install without the dev tools, torch from the CPU wheel index
ENV RECSYS_VENV=/opt/venv RECSYS_EDITABLE=0 RECSYS_EXTRAS= \
    RECSYS_TORCH_INDEX=https://download.pytorch.org/whl/cpu PIP_NO_CACHE_DIR=1
COPY pyproject.toml setup.py README.md ./
COPY scripts ./scripts
COPY kernels ./kernels
COPY recsys ./recsys
COPY pipelines ./pipelines
COPY service ./service
RUN bash scripts/install.sh

FROM python:3.11-slim AS runtime
# libgomp: the OpenMP runtime the kernels and torch use (the build stage had it through g++)
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY configs ./configs
ENV PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
# fails the build if the kernels did not make it into the image (and proves nothing compiles here)
RUN python -c "from kernels import tt_native; assert tt_native.loaded_level(), 'TT kernels missing'"

EXPOSE 8000
# the service by default; docker-compose.yml runs the trainer with another command
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
