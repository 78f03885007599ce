"""Contents of the site-packages start-up files, shared by ``setup.py`` and the CLI.

The .pth line is guarded: if the package was removed but the .pth left behind, the
interpreter starts silently (an unguarded import would print "Error processing line 1").
"""

from sglang_fastload.constants import ENV_ENABLE

PTH_LINE = (
    "import os; os.environ.get('%s', '1').strip() == '0' or "
    "exec('try:\\n import sglang_fastload._hook as h\\nexcept ImportError:\\n pass\\n"
    "else:\\n h.install()')\n" % ENV_ENABLE
)

# PEP 829 (Python 3.15+): a matching .start file replaces the .pth's import line.
START_LINE = "sglang_fastload._hook:install\n"
