"""Copy text to the system clipboard with the platform's own tool, when there is one."""

import os
import shutil
import subprocess
import sys

# (command, environment variable that must be set for it to work)
_TOOLS = (
    (["pbcopy"], None),
    (["wl-copy"], "WAYLAND_DISPLAY"),
    (["xclip", "-selection", "clipboard"], "DISPLAY"),
    (["xsel", "--clipboard", "--input"], "DISPLAY"),
)


def copy_to_system(text: str) -> bool:
    """True when a clipboard tool took the text; False when none is available or it failed."""
    for command, needs in _TOOLS:
        if command[0] == "pbcopy" and sys.platform != "darwin":
            continue
        if (needs and not os.environ.get(needs)) or shutil.which(command[0]) is None:
            continue
        try:
            subprocess.run(command, input=text.encode("utf-8"), timeout=2, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            continue
        return True
    return False
