"""Real engines the tests start themselves: a one-node Slurm cluster and a Docker engine.

Each is started from Debian's packages (scripts/system-deps.sh installs them) into a private
temporary folder, on private sockets and ports, so it never touches the host's own services and
two test sessions on one machine do not collide. A start that fails raises with the engine's log
tail: tests that need an engine fail, they never skip.
"""
