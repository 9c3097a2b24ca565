# Image for a Ray cluster running mtnlg-ray: the rayproject/ray image of the Ray version we pin,
# CPU or GPU by build argument.
#   docker build -t mtnlg-ray:cpu .
#   docker build --build-arg VARIANT=gpu -t mtnlg-ray:gpu .
# The files under cluster/ run <registry>/mtnlg-ray:<version>-<variant>, e.g. 0.1.0-gpu:
#   docker build --build-arg VARIANT=gpu -t ghcr.io/your-org/mtnlg-ray:0.1.0-gpu . && docker push ghcr.io/your-org/mtnlg-ray:0.1.0-gpu
ARG RAY_VERSION=2.60.0
ARG PYTHON=py311
ARG VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-${VARIANT}

ARG VARIANT=cpu
LABEL org.opencontainers.image.title="mtnlg-ray" org.opencontainers.image.version="0.1.0"
# Made by the image's user `ray` first: a WORKDIR that does not exist is root's under builders other
# than BuildKit (the classic builder, kaniko, buildah), and `pip install .` could not write there.
RUN mkdir -p /home/ray/mtnlg-ray
WORKDIR /home/ray/mtnlg-ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users mtnlg_ray ./mtnlg_ray
# Entrypoints for plain Ray tooling (KubeRay's RayJob runs /home/ray/mtnlg-ray/jobs/pretrain.py).
COPY --chown=ray:users jobs ./jobs
# CPU images take torch's CPU wheel index; GPU images take PyPI's default CUDA build, whose CUDA the
# nodes' NVIDIA driver must support. For older drivers pick a CUDA build by its wheel index:
#   docker build --build-arg VARIANT=gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
ARG TORCH_INDEX=default
RUN if [ "$TORCH_INDEX" != "default" ]; then \
        pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX"; \
    elif [ "$VARIANT" = "cpu" ]; then \
        pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
    else \
        pip install --no-cache-dir torch==2.13.0; \
    fi \
 && pip install --no-cache-dir . \
 && mtnlg-ray --help > /dev/null
