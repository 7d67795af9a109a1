"""Project infrastructure: how work leaves a request for a worker.

``dispatch.queues`` names the queues; ``dispatch.django_q2`` enqueues onto them through
django-q2's ORM broker (the only dispatcher today; another, such as a push service,
would sit beside it and take the same queue names).
"""
