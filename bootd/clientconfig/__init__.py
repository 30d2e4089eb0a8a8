"""What a client boots into: config models, the renderer of its Upstart jobs / systemd units, and
how those files reach it (HTTP, TFTP, `bootctl client render`)."""
