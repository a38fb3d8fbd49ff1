"""Small reusable widgets of the chat screen."""
