from django.db import transaction
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from shop.models import Order
from shop.tasks import send_receipt


@csrf_exempt  # an example API endpoint; keep CSRF protection in a real form view
@require_POST
def create_order(request):
    with transaction.atomic():
        order = Order.objects.create(item=request.POST.get("item", "book"))
        job = send_receipt.delay(order.id)  # staged in this transaction
    return JsonResponse({"order": order.id, "job": job.id}, status=201)


@csrf_exempt
@require_POST
def create_order_and_fail(request):
    with transaction.atomic():
        order = Order.objects.create(item=request.POST.get("item", "book"))
        send_receipt.delay(order.id)
        raise RuntimeError(f"payment for order {order.id} declined")  # rolls back order and job
