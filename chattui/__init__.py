"""chattui: the terminal UI and command line. It works with text and plain numbers, never tensors."""
