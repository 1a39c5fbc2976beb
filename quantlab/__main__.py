"""``python -m quantlab``: the same command line as the ``quantlab`` entry point.

(Running ``quantlab.cli`` itself as ``__main__`` would build a second, partial app: the engine and serving
commands register on the imported ``quantlab.cli`` module, not on ``__main__``.)"""

from quantlab.cli import main

if __name__ == "__main__":  # importing the module (the wheel test imports every module) runs nothing
    main()
