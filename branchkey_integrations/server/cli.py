"""Kept so that ``python -m branchkey_integrations.server.cli`` still runs ``branchkey-local``.

The command line lives in :mod:`branchkey_integrations.cli`, above the server package (it also
drives commands beyond serving, whose code the server must not import). This module imports
nothing: run as a script, it hands over to that module; imported, it does nothing.
"""

if __name__ == "__main__":
    import runpy

    runpy.run_module("branchkey_integrations.cli", run_name="__main__", alter_sys=True)
