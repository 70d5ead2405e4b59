"""The apps: the loader (`session`) every front end shares, the command line, the Gradio demo,
evaluation runs and face fix. They may import every layer below; nothing below imports them."""
