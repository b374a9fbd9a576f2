"""A fake ``apptainer`` executable: parses ``exec`` options, checks them, runs the command locally.

There is no Apptainer on the test machines (Debian bookworm has no package). Tests copy this
file into a temporary folder as ``apptainer`` (shebang = the test interpreter) and put that
folder first on PATH. It accepts the options our runtime uses (``--cleanenv``, ``--bind
src:dst:ro|rw``, ``--env K=V``, ``--pwd``, ``--cpus``, ``--memory``), rejects unknown ones and
missing .sif images / bind sources like the real binary (exit 255, "FATAL: ..."), appends what
it parsed as one JSON line to ``$FAKE_APPTAINER_LOG``, then ``exec``s the command with
container paths translated back to host paths through the binds (so a wrong bind breaks the
run), with a clean environment (PATH, HOME) plus ``--env`` values when ``--cleanenv`` is given.
It does NOT isolate anything: read-only binds are not enforced.
"""

import json
import os
import sys

VALUE_OPTIONS = {"--bind", "-B", "--env", "--pwd", "--cpus", "--memory"}
FLAG_OPTIONS = {"--cleanenv", "-e", "--containall", "--writable-tmpfs", "--no-home"}


def fatal(message):
    sys.stderr.write(f"FATAL:   {message}\n")
    sys.exit(255)


def main(args):
    if not args or args[0] != "exec":
        fatal(f"fake apptainer supports only 'exec', got {args[:1]}")
    args = args[1:]
    opts = {"binds": [], "env": {}, "cleanenv": False, "pwd": None, "cpus": None, "memory": None}
    while args and args[0].startswith("-"):
        opt = args.pop(0)
        if opt in FLAG_OPTIONS:
            opts["cleanenv"] = opts["cleanenv"] or opt in ("--cleanenv", "-e")
            continue
        if opt not in VALUE_OPTIONS:
            sys.stderr.write(f"Error: unknown flag: {opt}\n")
            sys.exit(255)
        if not args:
            fatal(f"flag needs an argument: {opt}")
        value = args.pop(0)
        if opt in ("--bind", "-B"):
            parts = value.split(":")
            if len(parts) != 3 or parts[2] not in ("ro", "rw"):
                fatal(f"bind {value!r}: expected src:dst:ro|rw")
            if not os.path.exists(parts[0]):
                fatal(f"container creation failed: mount {parts[0]}->{parts[1]} error: "
                      f"while mounting {parts[0]}: mount source {parts[0]} doesn't exist")
            opts["binds"].append(parts)
        elif opt == "--env":
            key, sep, val = value.partition("=")
            if not sep:
                fatal(f"--env {value!r}: expected K=V")
            opts["env"][key] = val
        else:
            opts[opt[2:]] = value
    if not args:
        fatal("no image given")
    image, command = args[0], args[1:]
    if image.endswith(".sif") and not os.path.isfile(image):
        fatal(f"could not open image {image}: failed to retrieve path for {image}: no such file or directory")
    if not command:
        fatal("no command given")
    opts.update(image=image, command=command)
    record = os.environ.get("FAKE_APPTAINER_LOG")
    if record:
        with open(record, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(opts) + "\n")

    # Longest container path first, so /data/in wins over /data.
    binds = sorted(opts["binds"], key=lambda b: len(b[1]), reverse=True)

    def to_host(arg):
        for src, dst, _mode in binds:
            if arg == dst or arg.startswith(dst.rstrip("/") + "/"):
                return src + arg[len(dst):]
        return arg

    if opts["cleanenv"]:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": os.environ.get("HOME", "/")}
    else:
        env = dict(os.environ)
    env.update(opts["env"])
    if opts["pwd"]:
        os.chdir(to_host(opts["pwd"]))
    argv = [to_host(a) for a in command]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        fatal(f"\"{command[0]}\": executable file not found in $PATH ({exc})")


if __name__ == "__main__":
    main(sys.argv[1:])
