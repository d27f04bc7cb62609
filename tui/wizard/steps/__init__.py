"""The wizard's steps, one module each, in the order the user meets them."""
