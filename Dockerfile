# videoconsult server image.
#
#   docker build -t videoconsult .
#   docker run --rm -p 127.0.0.1:8080:8080 \
#       -e VIDEOCONSULT_SECURITY_MASTER_KEY=... \
#       -e VIDEOCONSULT_SERVER_PUBLIC_URL=https://video.example.org \
#       -v videoconsult-data:/var/lib/videoconsult videoconsult
#
# The image runs in production mode, so it needs a master key (32 random bytes,
# URL-safe base64) and the public address browsers use (https). Without a database URL it keeps a SQLite file in the data
# volume; docker-compose.yml wires it to PostgreSQL and Redis instead.

# Every package comes from requirements/runtime.txt (exact versions, checked
# against their hashes; ./scripts/lock makes it): the image holds the set the
# tests ran with, whichever day it is built.

# --- build: turn the source tree into a wheel (no dev or test extras) ---------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY requirements/runtime.txt requirements/runtime.txt
# The locked pip and setuptools build the wheel; nothing unlocked is fetched for it.
RUN pip install --require-hashes --no-deps -r requirements/runtime.txt
COPY . .
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# --- runtime -------------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIDEOCONSULT_MODE=production \
    VIDEOCONSULT_DATA_DIR=/var/lib/videoconsult

# A fixed, unprivileged user. The data directory is created here, owned by it
# and private (0700), so that a fresh named volume inherits that ownership.
RUN groupadd --system --gid 10001 videoconsult \
 && useradd --system --uid 10001 --gid videoconsult \
        --home-dir /var/lib/videoconsult --no-create-home --shell /usr/sbin/nologin \
        videoconsult \
 && install -d -m 0700 -o videoconsult -g videoconsult /var/lib/videoconsult /var/lib/videoconsult/recordings

COPY requirements/runtime.txt /tmp/runtime.txt
COPY --from=build /wheels /tmp/wheels
RUN pip install --require-hashes --no-deps -r /tmp/runtime.txt \
 && pip install --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels /tmp/runtime.txt

WORKDIR /var/lib/videoconsult
VOLUME ["/var/lib/videoconsult"]
USER 10001:10001
EXPOSE 8080

# slim has no curl: ask /healthz with the standard library. urlopen raises on
# anything but a 2xx answer, which exits non-zero and marks the container unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

CMD ["videoconsult", "serve", "--host", "0.0.0.0", "--port", "8080"]
