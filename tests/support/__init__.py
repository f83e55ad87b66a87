"""What the tests run against and share: real servers and stand-ins, and the helpers and configs of several modules.

Test modules import from here, never from one another.
"""
