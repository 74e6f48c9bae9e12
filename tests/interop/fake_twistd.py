"""Stand-in for ``twistd ... coderstack-agent`` used by the terraform build tests.

Takes twistd's ``--pidfile P --logfile L`` and a service name; daemonizes like twistd (the
parent exits 0 once the pidfile exists), records the agent's environment in the log file and
waits for SIGTERM, which removes the pidfile.
"""

import os
import signal
import sys
import time


def main() -> None:
    args = sys.argv[1:]
    pidfile = args[args.index("--pidfile") + 1]
    logfile = args[args.index("--logfile") + 1]
    if os.fork():
        for _ in range(200):
            if os.path.exists(pidfile):
                sys.exit(0)
            time.sleep(0.05)
        sys.exit(1)
    os.setsid()
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    with open(logfile, "a") as log:
        for name in ("CODER_AGENT_URL", "CODER_AGENT_AUTH", "CODER_AGENT_TOKEN", "CODER_AGENT_DATA_DIR"):
            log.write(f"{name}={os.environ.get(name, '')}\n")
        leaked = sorted(k for k in os.environ
                        if k.startswith(("CODER_WORKSPACE_", "CODER_AGENT_SCRIPT_", "TF_")))
        log.write(f"provisioner_env={','.join(leaked)}\n")
        log.write(f"service={args[-1]}\n")

    def stop(*_):
        try:
            os.unlink(pidfile)
        except OSError:
            pass
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
