from django.db import models


class Order(models.Model):
    item = models.CharField(max_length=100)
    created_at = models.DateTimeField(auto_now_add=True)


class Receipt(models.Model):
    """Written by the send_receipt task: one per run."""

    order = models.ForeignKey(Order, on_delete=models.CASCADE)
    task_id = models.CharField(max_length=255)
    sent_at = models.DateTimeField(auto_now_add=True)
