"""Authentication of professionals: passwords, TOTP, lockouts, sessions.

The rules (:mod:`passwords`, :mod:`totp`, :mod:`lockout`) import no aiohttp;
:mod:`login` and :mod:`enrolment` apply them to what :mod:`audit` keeps, and
:mod:`sessions` is the HTTP edge (cookies, the current account).
"""
