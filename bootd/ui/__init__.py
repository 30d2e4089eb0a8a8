"""The web dashboard (issue 18): server-rendered pages on their own listener (`ui.listen`), logins with the
admin accounts of the PXE admin menu, and every action sent to the same /api/v1 handlers bootctl uses."""
