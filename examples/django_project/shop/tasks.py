from celery import shared_task

from shop.models import Receipt


@shared_task(bind=True, reliable_job=True)
def send_receipt(self, order_id):
    """Reliable: enqueued inside a transaction, it exists only if that transaction commits."""
    Receipt.objects.create(order_id=order_id, task_id=self.request.id)
