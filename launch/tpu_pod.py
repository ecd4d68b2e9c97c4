"""Run the same command on every worker of a Cloud TPU VM pod slice, through gcloud.

    python -m launch.tpu_pod --tpu=my-v5p-128 --zone=us-east5-a --copy --setup="pip install -e .[tpu]" -- \\
        python -m tpullm.train --config=configs/llama2_7b.py --workdir=gs://my-bucket/llama2_7b
    python -m launch.tpu_pod ... --dry_run     # print the commands, run nothing

Every worker runs the command at the same time (`gcloud compute tpus tpu-vm ssh --worker=all`);
`tpullm.train` then calls `jax.distributed.initialize()`, which finds the other workers from the
TPU VM's metadata, so the command needs no process ids. The workdir must be shared by all
workers (a gs:// bucket). Steps, each optional but the last:
  --copy    pack the git HEAD of this repository (`git archive`), copy it to every worker and
            unpack it into --remote_dir;
  --setup   a shell command run in --remote_dir on every worker first (e.g. pip install);
  then the command, in --remote_dir, with --env variables set.
"""

import argparse
import re
import shlex
import subprocess
import sys

ARCHIVE = "/tmp/tpullm_code.tar.gz"


def gcloud(verb: str, *args, zone: str, project: str | None) -> list:
    """A `gcloud compute tpus tpu-vm` command that acts on every worker."""
    return [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        verb,
        *args,
        "--worker=all",
        f"--zone={zone}",
        *([f"--project={project}"] if project else []),
    ]


def quote_path(path: str) -> str:
    """`path` as one word of the worker's shell, so that `~/x; rm -rf ~` stays a directory name.

    A leading `~/` or `~user/` stays unquoted, slash included: the shell expands a tilde prefix only
    when no character of it is quoted, and the prefix runs to the first unquoted slash.
    """
    home = re.match(r"~[A-Za-z0-9._-]*(/|$)", path)
    if not home:
        return shlex.quote(path)
    rest = path[home.end() :]
    return home.group() + (shlex.quote(rest) if rest else "")


def commands(
    tpu: str,
    zone: str,
    command: list,
    project: str | None = None,
    remote_dir: str = "~/tpullm",
    copy: bool = False,
    setup: str | None = None,
    env: list | None = None,
) -> list:
    """The argv lists to run, in order; each remote command is one string for the worker's shell."""

    def ssh(remote):
        return gcloud("ssh", tpu, f"--command={remote}", zone=zone, project=project)

    where = quote_path(remote_dir)
    out = []
    if copy:
        out.append(["git", "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"])
        out.append(gcloud("scp", ARCHIVE, f"{tpu}:{ARCHIVE}", zone=zone, project=project))
        out.append(ssh(f"mkdir -p {where} && tar -xzf {ARCHIVE} -C {where}"))
    if setup:
        out.append(ssh(f"cd {where} && {setup}"))  # a shell command by design
    exports = "".join(f"export {shlex.quote(kv)} && " for kv in env or [])
    out.append(ssh(f"cd {where} && {exports}{shlex.join(command)}"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpu", required=True, help="the TPU VM's name (gcloud compute tpus tpu-vm list)")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None)
    parser.add_argument("--remote_dir", default="~/tpullm", help="the repository's directory on each worker")
    parser.add_argument("--copy", action="store_true", help="copy this repository's git HEAD to every worker first")
    parser.add_argument("--setup", default=None, help="shell command run in --remote_dir on every worker first")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for the command (repeatable)",
    )
    parser.add_argument("--dry_run", action="store_true", help="print the commands instead of running them")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every worker runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- python -m tpullm.train --config=... --workdir=gs://...")
    bad = [e for e in args.env if "=" not in e]
    if bad:
        parser.error(f"--env takes NAME=VALUE; got {bad}")
    steps = commands(args.tpu, args.zone, command, args.project, args.remote_dir, args.copy, args.setup, args.env)
    for step in steps:
        print(shlex.join(step), flush=True)
        if args.dry_run:
            continue
        code = subprocess.run(step).returncode
        if code:
            print(f"launch.tpu_pod: step failed with exit code {code}: {shlex.join(step)}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
