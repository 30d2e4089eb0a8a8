"""Shared pieces of the client-config tests: the two-instance lab host and Upstart job parsing."""
from __future__ import annotations

import shlex

from bootd.config import parse_config

TWO_INSTANCE_YAML = """
interfaces:
  - name: br0
    address: 10.77.0.1/24
images:
  - name: win10
  - name: debian12
groups:
  - name: room1
    images: [win10, debian12]
    clients:
      instances:
        - name: win10
          description: Windows 10 (room 1)
          image: win10
          memory: 4G
          cpus: 2
          extra_args: ["-usb", "-device usb-tablet", "-rtc base=localtime"]
        - name: debian
          image: debian12
          memory: 1024
          cpus: 1
          cache: none
          network: none
          vt: 9
      viewer:
        fullscreen: true
hosts:
  - mac: 52:54:00:77:00:01
    name: lab-pc-01
    group: room1
    clients:
      xserver:
        depth: 24
  - mac: 52:54:00:77:00:02
    name: lab-pc-02
    group: room1
"""


def two_instance_config():
    return parse_config(TWO_INSTANCE_YAML, "two-instances.yaml")


def upstart_exec(job_text: str) -> tuple[dict, str]:
    """The `env` settings and the `exec` command line of an Upstart job (what Upstart runs)."""
    env = {}
    command = None
    for line in job_text.splitlines():
        if line.startswith("env "):
            k, _, v = line[4:].partition("=")
            env[k] = shlex.split(v)[0] if v else ""
        elif line.startswith("exec "):
            command = line[5:]
    assert command is not None, "job has no exec line"
    return env, command
