# Sandrun worker and coordinator in one image (Debian 12).
#
#   docker build -t sandrun .
#   worker (cgroup v2 host; see the README's "Deploy" section for why each flag):
#     docker run -d --name sandrun --privileged --cgroupns=private -p 8443:8443 \
#         -v sandrun-keys:/var/lib/sandrun sandrun
#   coordinator (no privileges):
#     docker run -d -p 9000:9000 -v $PWD/workers.json:/etc/sandrun/workers.json:ro \
#         --entrypoint sandrun-coordinator sandrun --workers /etc/sandrun/workers.json \
#         --listen 0.0.0.0:9000
#
# The worker must be PID 1 of the container (no --init): on cgroup v2 it moves itself
# into a leaf of the container's cgroup and makes its job cgroups beside it, and it
# refuses to move processes that are not its own.
FROM debian:12-slim
COPY . /usr/src/sandrun
WORKDIR /usr/src/sandrun
RUN bash ./scripts/install.sh --worker-only \
    && rm -rf /var/lib/apt/lists/* /root/.cache
EXPOSE 8443 9000
VOLUME ["/var/lib/sandrun"]
ENTRYPOINT ["sandrun"]
CMD ["serve", "--listen", "0.0.0.0:8443", "--state-dir", "/run/sandrun", \
     "--env-dir", "/var/lib/sandrun/environments", "--deps-dir", "/var/cache/sandrun/deps"]
