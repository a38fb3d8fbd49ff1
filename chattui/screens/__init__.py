"""The app's screens: the chat screen and its modal dialogs."""
